"""Recurrent (stateful) causal GMA: carry the K-slot memory across calls (definition, section 3).

Dimension legend: B batch, H heads, N tokens of this call, d, e, K as everywhere.

Causal GMA is a recurrence over a state of K*(e+1) numbers per head:

    S += outer(r(k_t), v_t);  z += r(k_t);  o_t = read(r(q_t), S, z)

`gma_recurrent` runs a chunk of N >= 1 tokens from a given state and returns the
outputs and the state after the chunk; `gma_step` is the one-token case, through its
own serial fused kernels (gma_np.mixers.gma.kernels._step_log_densities,
gma_np.memory.step) because at one token the cost is latency: Python overhead and
thread-pool wake-ups, not flops. Running a sequence in chunks, or token by token,
gives the same outputs as `gma(..., causal=True)` on the whole sequence
(tests/test_recurrent.py). A step costs O(K (d + e)) per head whatever the position:
the state does not grow.

The state is float64 whatever the dtype of q, k, v: it is the accumulator of
the scan (gma_np._numerics.ACCUM_DTYPE), and keeping it in float64 is what
keeps long float32 generations from drifting.
"""

from dataclasses import dataclass

import numpy as np

from gma_np import _validation as check
from gma_np._numerics import ACCUM_DTYPE, DEFAULT_EPS
from gma_np._threads import threads_for
from gma_np.memory.scan import _causal_scan_forward
from gma_np.memory.step import _step_write_read
from gma_np.mixers.gma.kernels import _softmax_rows_forward, _step_log_densities
from gma_np.mixers.gma.mixing import _validate, _z_read, check_output_finite
from gma_np.mixers.gma.routing import check_log_densities_finite, route_forward


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
    (q, k, v, mix, tau, per_head, tau_dtype,
     _, slot, eps, mask) = _validate(q, k, v, means, log_var, logits,
                                     True, norm, temperature, eps, key_mask)
    B, H, N, d = q.shape
    e = v.shape[3]
    K = mix.means.shape[1]
    state = _starting_state(state, B, H, K, e)
    r, _ = route_forward((q, k), mix, tau, names=("q", "k"))      # (2B, H, N, K)
    rq = r[:B].reshape(B * H, N, K)
    rk = (r[B:] * mask.astype(r.dtype)[:, None, :, None]).reshape(B * H, N, K)
    S = state.S.reshape(B * H, K, e).copy()                        # (P, K, e) in: initial, out: final
    z = state.z.reshape(B * H, K).copy()                           # (P, K)
    z0 = state.z.reshape(B * H, K)                                 # (P, K) as passed, not modified
    o = np.empty((B * H, N, e), dtype=v.dtype)
    v3 = v.reshape(B * H, N, e)
    with threads_for(B * H * N * K * e):
        _causal_scan_forward(rq, rk, v3, slot, eps, S, z, o)
    check_output_finite(o, eps, rq, v3, slot, _z_read(rk, True, z0))
    return o.reshape(B, H, N, e), GMAState(S.reshape(B, H, K, e), z.reshape(B, H, K))


def gma_step(q_t, k_t, v_t, means, log_var, logits, state=None, *, norm="row",
             temperature=1.0, eps=DEFAULT_EPS, key_mask_t=None):
    """One token of causal GMA: q_t, k_t (B, H, d), v_t (B, H, e) -> (o_t (B, H, e), state).

    key_mask_t is a bool array (B,) or None: a False token writes nothing.
    """
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
    # the same validation as gma_recurrent on the (B, H, 1, .) chunk, then one serial
    # fused kernel (no thread pool, no (2B, H, 1, .) temporaries: see gma_np.memory.step)
    (q, k, v, mix, tau, _, _, _, slot, eps, mask) = _validate(
        *arrays, means, log_var, logits, True, norm, temperature, eps, mask)
    B, H, _, d = q.shape
    e = v.shape[3]
    K = mix.means.shape[1]
    state = _starting_state(state, B, H, K, e)
    S = state.S.copy()                                             # (B, H, K, e)
    z = state.z.copy()                                             # (B, H, K)
    o = np.empty((B, H, e), dtype=v.dtype)
    l = np.empty((2 * B, H, 1, K))                                 # l of q_t (rows :B), k_t (B:)
    _step_log_densities(np.stack([q[:, :, 0], k[:, :, 0]]), mix.means, mix.inv_var, mix.const,
                        l.reshape(2, B, H, K))
    r = np.empty_like(l)                                           # softmax_k(l / tau)
    row_max = np.empty((2 * B, H, 1))                              # NaN where no l_k is finite
    _softmax_rows_forward(l, 1.0 / tau, 0, r, row_max)
    check_log_densities_finite(row_max, (q, k), ("q_t", "k_t"), mix)
    r = r.reshape(2, B, H, K)
    _step_write_read(r[0], r[1], v[:, :, 0], np.ascontiguousarray(mask[:, 0]), slot, eps, S, z, o)
    z_after = z.reshape(B * H, K)
    check_output_finite(o.reshape(B * H, 1, e), eps, r[0].reshape(B * H, 1, K),
                        v.reshape(B * H, 1, e), slot, lambda p, n: z_after[p])
    return o, GMAState(S, z)
