"""Causal softmax attention with a key/value cache: decode a chunk of tokens after a prefix.

Dimension legend: B batch, H heads, n tokens of this call, T tokens cached before it,
d query/key head size, e value head size.

Softmax attention has no fixed-size state: the query of token t reads every key and
value before it. The state is therefore the cache of all keys and values seen so far
(and of which of them are padding). A chunk of n >= 1 tokens appends its keys and
values, then its queries attend to the T + n cached keys with the causal mask inside
the chunk: the blocked forward (blocked.attend_forward) with the queries at positions
T .. T + n - 1. Running a sequence in chunks of any sizes, token by token included,
equals softmax_attention(..., causal=True) on the whole (tests/mixers/test_softmax.py).
A step costs O(T (d + e)) per head: it grows with the position, unlike GMA's.

Storage grows by doubling: the buffers hold a capacity of a power of two tokens (at
least KV_INITIAL_CAPACITY); when a chunk does not fit, they are copied into buffers of
twice the capacity (or more, for a long chunk). Appending is amortised O(1) per token
and the buffers never hold more than twice the tokens cached; nothing needs to know
the final length in advance. Keys and values are kept in the dtype they came in
(no rounding: float32 stays float32, widened to float64 block by block as in the
forward); the first chunk sets the dtype, later chunks must match.

States are values: decoding from a state never changes what it holds. The buffers are
shared between a state and the states that continue it, each state seeing only its
first T tokens; a chunk is written in place only after the last token written to the
buffers, and continuing from an earlier state (a second branch from the same prefix)
copies that state's T tokens into new buffers first.
"""

import math

import numpy as np
from numba import njit

from gma_np import _validation as check
from gma_np.mixers.softmax.blocked import (
    SOFTMAX_BLOCK,
    attend_forward,
    validate_scale,
)

# --- constants ---------------------------------------------------------------------------

# Tokens of the first allocation of the cache. Small next to the contexts decoded
# (hundreds to thousands of tokens); below it, the doubling copies would cost a few
# microseconds each and happen at every power of two.
KV_INITIAL_CAPACITY = 64


class _KVBuffers:
    """The arrays behind one or more states: written up to `filled` tokens."""

    def __init__(self, B, H, d, e, capacity, dtype):
        self.keys = np.empty((B, H, capacity, d), dtype=dtype)      # (B, H, C, d)
        self.values = np.empty((B, H, capacity, e), dtype=dtype)    # (B, H, C, e)
        self.admissible = np.empty((B, capacity), dtype=bool)       # (B, C) False = padding
        self.filled = 0

    @property
    def capacity(self):
        return self.keys.shape[2]


class SoftmaxAttentionState:
    """The key/value cache of causal softmax attention after a prefix of T tokens.

    SoftmaxAttentionState(B, H, d, e) is the empty cache (T = 0). Read-only views:
    keys (B, H, T, d), values (B, H, T, e), key_mask (B, T) bool (False = padding);
    length T; dtype (None until the first chunk).
    """

    def __init__(self, B, H, d, e):
        for name, value in (("B", B), ("H", H), ("d", d), ("e", e)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                    or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        self.shape = (int(B), int(H), int(d), int(e))
        self.length = 0
        self._buffers = None

    @property
    def dtype(self):
        return None if self._buffers is None else self._buffers.keys.dtype

    def _view(self, a):
        view = a[..., :self.length, :] if a.ndim == 4 else a[:, :self.length]
        view = view.view()
        view.flags.writeable = False
        return view

    @property
    def keys(self):
        B, H, d, e = self.shape
        return np.empty((B, H, 0, d)) if self._buffers is None else self._view(self._buffers.keys)

    @property
    def values(self):
        B, H, d, e = self.shape
        return np.empty((B, H, 0, e)) if self._buffers is None else self._view(self._buffers.values)

    @property
    def key_mask(self):
        B = self.shape[0]
        return (np.empty((B, 0), dtype=bool) if self._buffers is None
                else self._view(self._buffers.admissible))

    def __repr__(self):
        B, H, d, e = self.shape
        return f"SoftmaxAttentionState(B={B}, H={H}, d={d}, e={e}, length={self.length}, dtype={self.dtype})"

    def appended(self, k, v, admissible):
        """The state after appending k (B, H, n, d), v (B, H, n, e), admissible (B, n) bool."""
        B, H, d, e = self.shape
        T, n = self.length, k.shape[2]
        buffers = self._buffers
        in_place = (buffers is not None and buffers.filled == T and buffers.capacity >= T + n)
        if not in_place:
            # a new buffer: the first chunk, a full one, or a branch from an earlier state
            capacity = max(KV_INITIAL_CAPACITY, 1 << (T + n - 1).bit_length())
            grown = _KVBuffers(B, H, d, e, capacity, k.dtype)
            if T:
                grown.keys[:, :, :T] = buffers.keys[:, :, :T]
                grown.values[:, :, :T] = buffers.values[:, :, :T]
                grown.admissible[:, :T] = buffers.admissible[:, :T]
            buffers = grown
        buffers.keys[:, :, T:T + n] = k
        buffers.values[:, :, T:T + n] = v
        buffers.admissible[:, T:T + n] = admissible
        buffers.filled = T + n
        state = SoftmaxAttentionState(B, H, d, e)
        state.length, state._buffers = T + n, buffers
        return state


def _check_state(state, q, v):
    B, H, n, d = q.shape
    e = v.shape[3]
    if not isinstance(state, SoftmaxAttentionState):
        raise TypeError(f"state: expected a SoftmaxAttentionState (SoftmaxAttentionState(B, H, d, e) "
                        f"is the empty one) or None, got {type(state).__name__}")
    if state.shape != (B, H, d, e):
        raise ValueError(f"state: holds (B, H, d, e) = {state.shape}, but q, v of this chunk have "
                         f"{(B, H, d, e)} (q {q.shape}, v {v.shape})")
    if state.dtype is not None and state.dtype != q.dtype:
        raise TypeError(f"q, k, v: expected dtype {state.dtype} (the dtype of the cached keys and "
                        f"values), got {q.dtype}")


def softmax_attention_recurrent(q, k, v, state=None, *, key_mask=None, scale=None):
    """Causal softmax attention over a chunk of tokens, continuing from a key/value cache.

    Parameters
    ----------
    q, k : arrays of shape (B, H, n, d);  v : array of shape (B, H, n, e); n >= 1 new tokens
    state : SoftmaxAttentionState of the T tokens before the chunk, or None for none.
        It is not modified.
    key_mask : bool array of shape (B, n) or None: False marks a padding token of the
        chunk, whose key gets zero weight from every later query as well
    scale : factor of the scores, None for 1/sqrt(d); use the same for every chunk

    Returns
    -------
    o : array of shape (B, H, n, e), dtype of q
    state : SoftmaxAttentionState of the T + n tokens
    """
    q, k, v = check.qkv(q, k, v)
    B, H, n, d = q.shape
    scale = validate_scale(scale, d)
    if state is None:
        state = SoftmaxAttentionState(B, H, d, v.shape[3])
    _check_state(state, q, v)
    admissible = check.key_mask(key_mask, B, n) > 0.5                  # (B, n) bool
    state = state.appended(k, v, admissible)
    T = state.length
    buffers = state._buffers
    keys = buffers.keys[:, :, :T]                                      # (B, H, T, d) views
    values = buffers.values[:, :, :T]                                  # (B, H, T, e)
    mask = buffers.admissible[:, :T]
    key_bias = None if mask.all() else np.where(mask, 0.0, -np.inf)[:, None, None, :]
    o, _ = attend_forward(q, keys, values, key_bias, T - n, True, scale, SOFTMAX_BLOCK)
    return o, state


# ---------------------------------------------------------------- the model's fused decode

@njit(cache=True)
def _softmax_token_step(q, k, v, scale, T, keys_t, values, o, scores):
    """One token of causal softmax attention in every head of one sequence: append k_t, v_t
    to the cache at token T, then attend over tokens 0..T (the operations of
    attend_forward for one query, in float64: q scaled first, scores, row softmax, p V).

    q, k     (H*d,) float64, head h at [h d, (h + 1) d);  v, o (H*e,) float64, o written
    keys_t   (H, d, C) float64 cached keys, transposed: the scores of one query are then
             d passes over contiguous rows of C (vectorised), each score still adding
             its d terms in order
    values   (H, C, e) float64 cached values; C > T
    scores   (C,) float64 scratch
    """
    H, d, C = keys_t.shape
    e = values.shape[2]
    n = T + 1
    for h in range(H):
        for j in range(d):
            keys_t[h, j, T] = k[h * d + j]
        for c in range(e):
            values[h, T, c] = v[h * e + c]
        for t in range(n):
            scores[t] = 0.0
        for j in range(d):
            qj = q[h * d + j] * scale
            for t in range(n):
                scores[t] += qj * keys_t[h, j, t]
        top = scores[0]
        for t in range(1, n):
            top = max(top, scores[t])
        total = 0.0
        for t in range(n):
            p = math.exp(scores[t] - top)
            scores[t] = p
            total += p
        inv_total = 1.0 / total
        for c in range(e):
            o[h * e + c] = 0.0
        for t in range(n):
            p = scores[t] * inv_total
            for c in range(e):
                o[h * e + c] += p * values[h, t, c]
