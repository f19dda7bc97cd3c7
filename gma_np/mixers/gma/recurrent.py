"""Recurrent (stateful) causal GMA: carry the K-slot memory across calls (definition, section 3).

Dimension legend: B batch, H heads, N tokens of this call, d, e, K as everywhere.

Causal GMA is a recurrence over a state of K*(e+1) numbers per head:

    S += outer(r(k_t), v_t);  z += r(k_t);  o_t = read(r(q_t), S, z)

`gma_recurrent` runs a chunk of N >= 1 tokens from a given state and returns the
outputs and the state after the chunk; `gma_step` is the one-token case. Running a
sequence in chunks, or token by token, gives the same outputs as `gma(..., causal=True)`
on the whole sequence (tests/test_recurrent.py). A step costs O(K (d + e)) per head
whatever the position: the state does not grow.

One token (gma_step, and gma_recurrent with N = 1) is latency, not flops: a few
microseconds of arithmetic per layer, against microseconds for each NumPy call or
validation pass around it. So it goes through one fused serial kernel
(gma_np.mixers.gma.kernels._gma_step_fused: routing of q_t and k_t, the memory's write
and read) behind checks that cost a few attribute reads: the arguments' types, dtypes
and shapes here; finiteness inside the kernel, which reports a non-finite temperature,
log-density, output or normaliser (a NaN or inf among q_t, k_t, v_t or the state shows
up there) instead of raising; and the mixture through _STEP_MIXTURES: its means and
exp(-log_var) laid out for the kernel and its log-density constants, prepared (and
validated) once, used while means, log_var and logits keep the values they were
prepared from (the kernel compares them, one pass over 2 H K d numbers). Whenever the
kernel reports something, or an argument is not of the plain kind, the step runs the
chunk path instead, whose checks name the cause exactly as they do for any chunk.

The model's fused decode (gma_np.nn.decode) runs the same step inside its own kernel:
_gma_token_step, the operations of _gma_step_fused for one sequence, over a mixture
prepared once (token_step_arrays) and a state it updates in place.

The state is float64 whatever the dtype of q, k, v: it is the accumulator of
the scan (gma_np._numerics.ACCUM_DTYPE), and keeping it in float64 is what
keeps long float32 generations from drifting.
"""

from dataclasses import dataclass

import numpy as np
from numba import njit

from gma_np import _validation as check
from gma_np._numerics import ACCUM_DTYPE, DEFAULT_EPS, SUPPORTED_DTYPES
from gma_np._threads import threads_for
from gma_np.memory.scan import _causal_scan_forward
from gma_np.memory.step import _write_read_head
from gma_np.mixers.gma.kernels import STEP_DONE, STEP_STALE, _gma_step_fused, _route_token_pair
from gma_np.mixers.gma.mixing import _validate, _z_read, check_output_finite
from gma_np.mixers.gma.routing import prepare_mixture, route_forward


@dataclass
class GMAState:
    """The K-slot memory of causal GMA after some prefix of a sequence."""
    S: np.ndarray   # (B, H, K, e) float64, sum over the prefix of outer(r(k_j), v_j)
    z: np.ndarray   # (B, H, K)    float64, sum over the prefix of r(k_j)

    def copy(self):
        return GMAState(self.S.copy(), self.z.copy())


def init_state(B, H, K, e):
    """The empty memory (nothing written yet): S = 0 (B, H, K, e), z = 0 (B, H, K)."""
    return GMAState(np.zeros((B, H, K, e), dtype=ACCUM_DTYPE),
                    np.zeros((B, H, K), dtype=ACCUM_DTYPE))


def _check_state(state, B, H, K, e):
    if not isinstance(state, GMAState):
        raise TypeError(f"state: expected a GMAState (see init_state) or None, got {type(state).__name__}")
    check.check_shape("state.S", np.asarray(state.S), (B, H, K, e), "(B, H, K, e) from q, v and means")
    check.check_shape("state.z", np.asarray(state.z), (B, H, K), "(B, H, K) from q and means")
    for name, a in (("state.S", state.S), ("state.z", state.z)):
        if a.dtype != ACCUM_DTYPE:
            raise TypeError(f"{name}: expected dtype float64 (the state is an accumulator), got {a.dtype}")
        check.check_finite(name, a)


def _starting_state(state, B, H, K, e):
    """The state a call starts from: the empty memory for None, else `state` once checked."""
    if state is None:
        return init_state(B, H, K, e)
    _check_state(state, B, H, K, e)
    return state


def gma_recurrent(q, k, v, means, log_var, logits, state=None, *, norm="row",
                  temperature=1.0, eps=DEFAULT_EPS, key_mask=None):
    """Causal GMA over a chunk of tokens, continuing from `state`.

    Parameters
    ----------
    q, k : arrays of shape (B, H, N, d);  v : array of shape (B, H, N, e)
    means, log_var, logits, norm, temperature, eps, key_mask : as in gma
    state : GMAState with S (B, H, K, e), z (B, H, K), or None for the empty memory.
        It is not modified.

    Returns
    -------
    o : array of shape (B, H, N, e), dtype of q
    state : GMAState after the chunk
    """
    if (type(q) is np.ndarray and q.ndim == 4 and q.shape[2] == 1 and type(k) is np.ndarray
            and k.ndim == 4 and type(v) is np.ndarray and v.ndim == 4):
        mask_t = key_mask
        if type(key_mask) is np.ndarray and key_mask.ndim == 2 and key_mask.shape[1] == 1:
            mask_t = key_mask[:, 0]
        if mask_t is None or mask_t is not key_mask:
            fused = _fused_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], means, log_var, logits,
                                state, norm, temperature, eps, mask_t)
            if fused is not None:
                o, state = fused
                return o[:, :, None], state
    return _chunk(q, k, v, means, log_var, logits, state, norm, temperature, eps, key_mask,
                  ("q", "k", "v"))


def _chunk(q, k, v, means, log_var, logits, state, norm, temperature, eps, key_mask, names):
    """gma_recurrent's checked path, for any N: validation, routing, the causal scan."""
    (q, k, v, mix, tau, per_head, tau_dtype,
     _, slot, eps, mask) = _validate(q, k, v, means, log_var, logits,
                                     True, norm, temperature, eps, key_mask)
    B, H, N, d = q.shape
    e = v.shape[3]
    K = mix.means.shape[1]
    state = _starting_state(state, B, H, K, e)
    r, _ = route_forward((q, k), mix, tau, names=names[:2])        # (2B, H, N, K)
    rq = r[:B].reshape(B * H, N, K)
    rk = (r[B:] * mask.astype(r.dtype)[:, None, :, None]).reshape(B * H, N, K)
    S = state.S.reshape(B * H, K, e).copy()                        # (P, K, e) in: initial, out: final
    z = state.z.reshape(B * H, K).copy()                           # (P, K)
    z0 = state.z.reshape(B * H, K)                                 # (P, K) as passed, not modified
    o = np.empty((B * H, N, e), dtype=v.dtype)
    v3 = v.reshape(B * H, N, e)
    with threads_for(B * H * N * K * e):
        _causal_scan_forward(rq, rk, v3, slot, eps, S, z, o)
    check_output_finite(o, eps, rq, v3, slot, _z_read(rk, True, z0), names[2], v)
    return o.reshape(B, H, N, e), GMAState(S.reshape(B, H, K, e), z.reshape(B, H, K))


def gma_step(q_t, k_t, v_t, means, log_var, logits, state=None, *, norm="row",
             temperature=1.0, eps=DEFAULT_EPS, key_mask_t=None):
    """One token of causal GMA: q_t, k_t (B, H, d), v_t (B, H, e) -> (o_t (B, H, e), state).

    key_mask_t is a bool array (B,) or None: a False token writes nothing. The state
    passed is not modified.
    """
    fused = _fused_step(q_t, k_t, v_t, means, log_var, logits, state, norm, temperature, eps,
                        key_mask_t)
    if fused is not None:
        return fused
    arrays = []
    for name, a in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        a = check.float_array(name, a, ndim=3)
        arrays.append(a[:, :, None, :])                            # (B, H, 1, .)
    mask = None
    if key_mask_t is not None:
        if not isinstance(key_mask_t, np.ndarray):
            raise TypeError(f"key_mask_t: expected a boolean array of shape (B,) or None, "
                            f"got {type(key_mask_t).__name__}")
        if key_mask_t.ndim != 1:
            raise ValueError(f"key_mask_t: expected shape (B,), got {key_mask_t.shape}")
        mask = key_mask_t[:, None]
    o, state = _chunk(*arrays, means, log_var, logits, state, norm, temperature, eps, mask,
                      ("q_t", "k_t", "v_t"))
    return o[:, :, 0], state


# ---------------------------------------------------------------- the fused one-token path

# Prepared mixtures of the one-token path, keyed by the ids of (means, log_var, logits):
# a model decodes with one mixture per layer, passing the same arrays every token. The
# id only finds an entry; what makes it valid is the kernel's comparison of the three
# arrays with the values it was prepared from. Entries are replaced whole (one atomic
# dict operation under the GIL). The dict is emptied when it holds STEP_MIXTURES_MAX
# entries: more layers than any model here has, and at most 32 x 5 H K d float64 (20 MB
# at H = 4, K = d = 64) held for mixtures that may be gone.
_STEP_MIXTURES = {}
STEP_MIXTURES_MAX = 32


@dataclass(frozen=True)
class _StepMixture:
    """What the fused step needs from a validated mixture, and the values it came from."""
    shapes: tuple                   # shapes and dtypes of (means, log_var, logits) as passed
    values: tuple                   # (means, log_var, logits) values prepared: copies
    means_t: np.ndarray             # (H, d, K) float64 means, j-major (see _gma_step_fused)
    inv_var_t: np.ndarray           # (H, d, K) float64 exp(-log_var), j-major
    const: np.ndarray               # (H, K) float64 log pi - 1/2 sum_j log_var - d/2 log 2 pi


def _signature(means, log_var, logits):
    return (means.shape, means.dtype, log_var.shape, log_var.dtype, logits.shape, logits.dtype)


def _prepare_step_mixture(means, log_var, logits):
    """The _StepMixture of validated parameters, or None if they do not validate (the
    checked path then raises its error, in its order of checks)."""
    try:
        mix = prepare_mixture(means, log_var, logits)
    except (TypeError, ValueError, FloatingPointError):
        return None
    entry = _StepMixture(shapes=_signature(means, log_var, logits),
                         values=(means.copy(), log_var.copy(), logits.copy()),
                         means_t=np.ascontiguousarray(mix.means.transpose(0, 2, 1)),
                         inv_var_t=np.ascontiguousarray(mix.inv_var.transpose(0, 2, 1)),
                         const=mix.const)
    if len(_STEP_MIXTURES) >= STEP_MIXTURES_MAX:
        _STEP_MIXTURES.clear()
    _STEP_MIXTURES[(id(means), id(log_var), id(logits))] = entry
    return entry


def _constant(value, n):
    """A read-only float64 array (n,) filled with value, made once per (value, n)."""
    a = _CONSTANTS.get((value, n))
    if a is None:
        if len(_CONSTANTS) >= STEP_MIXTURES_MAX:
            _CONSTANTS.clear()
        a = np.full(n, value)
        a.flags.writeable = False
        _CONSTANTS[(value, n)] = a
    return a


_CONSTANTS = {}     # (value, n) -> _constant's array: the all-ones mask, a scalar temperature


def _fused_step(q, k, v, means, log_var, logits, state, norm, temperature, eps, mask_t):
    """(o (B, H, e), GMAState) of one token through _gma_step_fused, or None when an
    argument is not of the plain kind or the kernel reports a non-finite value: then
    the caller runs the checked path (module docstring)."""
    # plain ndarrays (not subclasses) of one supported dtype, matching shapes; the mixture
    # C-ordered (its arrays are compared in place with the prepared values)
    if not (type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray
            and type(means) is np.ndarray and type(log_var) is np.ndarray
            and type(logits) is np.ndarray and q.ndim == 3 and means.ndim == 3
            and q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape == q.shape and v.ndim == 3 and v.shape[:2] == q.shape[:2]
            and 0 not in q.shape and v.shape[2] > 0 and means.flags.c_contiguous
            and log_var.flags.c_contiguous and logits.flags.c_contiguous
            and norm in check.NORMS):
        return None
    # a token sliced out of a sequence, q[:, :, t], is strided: copied (B H d numbers), so
    # that the kernel has one layout
    q, k, v = (a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in (q, k, v))
    B, H, d = q.shape
    e = v.shape[2]
    K = means.shape[1]
    if means.shape != (H, K, d) or K == 0:
        return None
    # eps, the temperature and the key mask, in plain forms the checked path accepts
    if not (isinstance(eps, (float, int)) and not isinstance(eps, bool) and 0 <= eps < np.inf):
        return None
    if isinstance(temperature, (float, int)) and not isinstance(temperature, bool):
        tau = _constant(float(temperature), H)          # not finite or <= 0: the kernel says
    elif (type(temperature) is np.ndarray and temperature.dtype in SUPPORTED_DTYPES
          and temperature.shape == (H,)):
        tau = temperature                               # the kernel reads it as float64
    else:
        return None
    if mask_t is None:
        mask = _constant(1.0, B)
    elif type(mask_t) is np.ndarray and mask_t.dtype == np.bool_ and mask_t.shape == (B,):
        mask = mask_t.astype(ACCUM_DTYPE)
    else:
        return None
    if state is None:
        S_in = np.zeros((B, H, K, e))
        z_in = np.zeros((B, H, K))
    elif (type(state) is GMAState and type(state.S) is np.ndarray and type(state.z) is np.ndarray
          and state.S.shape == (B, H, K, e) and state.z.shape == (B, H, K)
          and state.S.dtype == ACCUM_DTYPE and state.z.dtype == ACCUM_DTYPE
          and state.S.flags.c_contiguous and state.z.flags.c_contiguous):
        S_in, z_in = state.S, state.z
    else:
        return None
    S_out = np.empty((B, H, K, e))
    z_out = np.empty((B, H, K))
    o = np.empty((B, H, e), dtype=v.dtype)
    parameters = (means, log_var, logits)
    entry = _STEP_MIXTURES.get((id(means), id(log_var), id(logits)))
    for _ in range(2):
        if entry is None or entry.shapes != _signature(means, log_var, logits):
            entry = _prepare_step_mixture(means, log_var, logits)
            if entry is None:
                return None
        status = _gma_step_fused(q, k, v, mask, parameters, entry.values, entry.means_t,
                                 entry.inv_var_t, entry.const, tau, norm == "slot", float(eps),
                                 S_in, z_in, S_out, z_out, o)
        if status != STEP_STALE:
            break
        entry = None                                               # values changed in place
    if status != STEP_DONE:
        return None
    return o, GMAState(S_out, z_out)


# ---------------------------------------------------------------- the model's fused decode

def token_step_arrays(means, log_var, logits, temperature):
    """(means_t (H, d, K), inv_var_t (H, d, K), const (H, K), tau (H,)), all float64: what
    _gma_token_step reads of one layer's mixture, laid out as _gma_step_fused's (the
    mixture validated by prepare_mixture, whose errors this raises). temperature: the
    layer's (a number, or (H,) in the parameters' dtype, as the model's decode passes it)."""
    mix = prepare_mixture(means, log_var, logits)
    H = mix.means.shape[0]
    tau = np.broadcast_to(np.asarray(temperature).astype(np.float64), (H,))
    return (np.ascontiguousarray(mix.means.transpose(0, 2, 1)),
            np.ascontiguousarray(mix.inv_var.transpose(0, 2, 1)),
            np.ascontiguousarray(mix.const), np.ascontiguousarray(tau))


@njit(cache=True, error_model="numpy")  # x / 0 gives inf or nan, reported by the return value
def _gma_token_step(q, k, v, means_t, inv_var_t, const, tau, slot, eps, S, z, o, work):
    """One token of causal GMA in every head of one sequence, the state updated in place.

    The same operations, in the same order, as _gma_step_fused for one (b, h): the
    direct-form log-densities of q_t and k_t, their softmax with the temperature, then
    gma_np.memory.step._write_read_head. Returns False when a temperature, log-density,
    output or normaliser is not finite (the caller then runs the checked path).

    q, k       (H*d,) float64, head h at [h d, (h + 1) d) (split_heads' layout)
    v, o       (H*e,) float64; o written
    means_t, inv_var_t, const, tau   token_step_arrays' (float64)
    S, z       (H, K, e), (H, K) float64 state, updated in place
    work       (4 K + e,) float64 scratch
    """
    H, d, K = means_t.shape
    e = S.shape[2]
    lq = work[:K]
    lk = work[K:2 * K]
    rq = work[2 * K:3 * K]
    rk = work[3 * K:4 * K]
    num = work[4 * K:4 * K + e]
    for h in range(H):
        t = tau[h]
        if not (t > 0.0 and np.isfinite(t) and np.isfinite(1.0 / t)):
            return False
        if not _route_token_pair(q[h * d:(h + 1) * d], k[h * d:(h + 1) * d], means_t[h],
                                 inv_var_t[h], const[h], t, lq, lk, rq, rk):
            return False
        if not _write_read_head(rq, rk, v[h * e:(h + 1) * e], 1.0, slot, eps, S[h], z[h], S[h],
                                z[h], o[h * e:(h + 1) * e], num):
            return False
    return True
