"""Linear attention with elu + 1 features (Katharopoulos et al. 2020): the fast path.

Dimension legend: B batch, H heads, N tokens (of this call, in decoding), d query/key
head size, e value head size; P = B*H sequences.

Per head, with the key mask m (N,) (1 a real key, 0 padding):

    phi(x) = elu(x) + 1 = x + 1 (x > 0), exp(x) (x <= 0)      elementwise, so phi > 0
    rq_i = phi(q_i),  rk_j = m_j phi(k_j)                     (N, d)
    S_i = sum_{j in R(i)} outer(rk_j, v_j) (d, e),  z_i = sum_{j in R(i)} rk_j (d,)
    o_i = (rq_i S_i) / (rq_i . z_i + eps)                     R(i): all j, or j <= i (causal)

which is the feature memory of gma_np.memory with F = d: bidirectional by products
through the (d, e) memory, causal through GMA's prefix scan (or its chunked form), and
decoding from the state (S, z) of the prefix. No N x N array is formed; the dense form
is naive.py.

Backward (docs/mixers/linear.md): memory_backward gives drq, drk, dv; then

    dq = drq * phi'(q),  dk = m * drk * phi'(k),  phi'(x) = 1 (x > 0), exp(x) (x <= 0)

and phi'(x) = min(phi(x), 1) (x + 1 > 1 exactly when x > 0, and e^x <= 1 otherwise),
so the cache keeps the features, not q and k: min(rk, 1) is m phi'(k) for m in {0, 1}.

Numerics: the features, the memory and the read-out are float64 whatever the input
dtype (v and do are widened once); outputs and gradients are rounded once to it.
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

NAME = "linear attention"


@dataclass
class LinearAttentionCache:
    """What linear_attention_backward needs: the features and the values, float64.
    The memory is recomputed by memory_backward, not stored (O(d e), not O(N d e))."""
    shape: tuple            # (B, H, N, d, e)
    dtype: np.dtype         # dtype of q, k, v and of the output
    causal: bool
    eps: float
    rq: np.ndarray          # (P, N, d) phi(q), float64
    rk: np.ndarray          # (P, N, d) m * phi(k), float64
    v: np.ndarray           # (P, N, e) float64


class LinearAttentionState(MemoryState):
    """The (d, e) memory of causal linear attention after a prefix: S (B, H, d, e), z (B, H, d)."""


def elu_features(x):
    """phi(x) = elu(x) + 1, in float64: x + 1 where x > 0, exp(x) elsewhere (same shape)."""
    x = x.astype(ACCUM_DTYPE)
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def elu_features_derivative(phi):
    """phi'(x) from phi = phi(x): min(phi, 1) (module docstring)."""
    return np.minimum(phi, 1.0)


def _validate(q, k, v, causal, eps, key_mask):
    q, k, v = check.qkv(q, k, v)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    eps = check.eps_value(eps)
    B, N = q.shape[0], q.shape[2]
    mask = check.key_mask(key_mask, B, N)                          # (B, N) float64 0/1
    return q, k, v, bool(causal), eps, mask


def _features(q, k, mask):
    """rq = phi(q), rk = m * phi(k), as (P, N, d) float64."""
    B, H, N, d = q.shape
    rq = elu_features(q).reshape(B * H, N, d)
    rk = elu_features(k)
    rk *= mask[:, None, :, None]
    return rq, rk.reshape(B * H, N, d)


def linear_attention_forward(q, k, v, *, causal=False, key_mask=None, eps=DEFAULT_EPS):
    """Linear attention with elu + 1 features, returning the output and the cache.

    Parameters
    ----------
    q, k : arrays of shape (B, H, N, d), float32 or float64 (one dtype for q, k, v)
    v : array of shape (B, H, N, e)
    causal : bool, query i reads keys j <= i only
    key_mask : bool array of shape (B, N), or None; False keys write nothing
    eps : float >= 0, added to the read-out denominator

    Returns
    -------
    o : array of shape (B, H, N, e), dtype of q
    cache : LinearAttentionCache
    """
    q, k, v, causal, eps, mask = _validate(q, k, v, causal, eps, key_mask)
    B, H, N, d = q.shape
    e = v.shape[3]
    # 1. features: rq = phi(q), rk = m * phi(k)
    rq, rk = _features(q, k, mask)                                 # (P, N, d) float64
    v3 = v.reshape(B * H, N, e).astype(ACCUM_DTYPE)                # (P, N, e) float64
    # 2. write the (d, e) memory and read it out
    o = memory_forward(rq, rk, v3, causal=causal, eps=eps)         # (P, N, e) float64
    check_output_finite(NAME, o, eps)
    cache = LinearAttentionCache(shape=(B, H, N, d, e), dtype=q.dtype, causal=causal, eps=eps,
                                 rq=rq, rk=rk, v=v3)
    return o.astype(q.dtype).reshape(B, H, N, e), cache


def linear_attention_backward(do, cache):
    """Gradients of sum(o * do): dict "q", "k", "v", in the shapes and dtype of the inputs.

    Parameters
    ----------
    do : array of shape (B, H, N, e), the cotangent of o
    cache : LinearAttentionCache from linear_attention_forward
    """
    if not isinstance(cache, LinearAttentionCache):
        raise TypeError(f"cache: expected the LinearAttentionCache that linear_attention_forward "
                        f"returned, got {type(cache).__name__}")
    B, H, N, d, e = cache.shape
    do = check.float_array("do", do, ndim=4)
    check.check_shape("do", do, (B, H, N, e), "the shape of o, (B, H, N, e)")
    do3 = do.reshape(B * H, N, e).astype(ACCUM_DTYPE)
    # 2. in the forward pass this was: o = memory(rq, rk, v)
    drq, drk, dv = memory_backward(cache.rq, cache.rk, cache.v, do3, causal=cache.causal,
                                   eps=cache.eps)
    # 1. in the forward pass this was: rq = phi(q), rk = m * phi(k)
    #    dq = drq phi'(q);  dk = m drk phi'(k) = drk min(rk, 1)
    dq = drq * elu_features_derivative(cache.rq)
    dk = drk * elu_features_derivative(cache.rk)
    return {"q": dq.astype(cache.dtype).reshape(B, H, N, d),
            "k": dk.astype(cache.dtype).reshape(B, H, N, d),
            "v": dv.astype(cache.dtype).reshape(B, H, N, e)}


def linear_attention(q, k, v, *, causal=False, key_mask=None, eps=DEFAULT_EPS):
    """Linear attention with elu + 1 features: o (B, H, N, e). See linear_attention_forward."""
    return linear_attention_forward(q, k, v, causal=causal, key_mask=key_mask, eps=eps)[0]


def init_linear_attention_state(B, H, d, e):
    """The empty memory: S = 0 (B, H, d, e), z = 0 (B, H, d)."""
    return empty_state(LinearAttentionState, B, H, d, e)


def linear_attention_recurrent(q, k, v, state=None, *, key_mask=None, eps=DEFAULT_EPS):
    """Causal linear attention over a chunk of N >= 1 tokens, continuing from `state`.

    Parameters
    ----------
    q, k : arrays of shape (B, H, N, d);  v : array of shape (B, H, N, e)
    state : LinearAttentionState with S (B, H, d, e), z (B, H, d), or None for the empty
        memory; not modified
    key_mask, eps : as in linear_attention

    Returns
    -------
    o : array of shape (B, H, N, e), dtype of q
    state : LinearAttentionState after the chunk

    Any chunking of a sequence, token by token included, gives the causal
    linear_attention of the whole sequence (to rounding).
    """
    q, k, v, _, eps, mask = _validate(q, k, v, True, eps, key_mask)
    B, H, N, d = q.shape
    e = v.shape[3]
    if state is None:
        state = init_linear_attention_state(B, H, d, e)
    check_state(state, LinearAttentionState, B, H, d, e, "d from q, e from v")
    rq, rk = _features(q, k, mask)                                 # (P, N, d) float64
    o, S, z = memory_recurrent(rq, rk, v.reshape(B * H, N, e).astype(ACCUM_DTYPE),
                               state.S.reshape(B * H, d, e), state.z.reshape(B * H, d), eps=eps)
    check_output_finite(NAME, o, eps)
    return (o.astype(q.dtype).reshape(B, H, N, e),
            LinearAttentionState(S.reshape(B, H, d, e), z.reshape(B, H, d)))
