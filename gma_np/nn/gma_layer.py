"""The multi-head GMA layer (docs/definition.md, section 6), as a forward/backward pair.

Dimension legend: B batch, N tokens, D model width, H heads, d query/key head
size, e value head size, K mixture components.

    Q = X W_q + b_q  -> (B, H, N, d)        K = X W_k + b_k  -> (B, H, N, d)
    V = X W_v + b_v  -> (B, H, N, e)
    O_h = gma(Q_h, K_h, V_h; means_h, log_var_h, logits_h, tau_h)   (B, H, N, e), causal
    Y = concat_h(O_h) W_o + b_o             (B, N, D)

Parameters (a dict, the names below):
    Wq, Wk (D, H*d)   bq, bk (H*d,)   Wv (D, H*e)   bv (H*e,)   Wo (H*e, D)   bo (D,)
    means (H, K, d)   log_var (H, K, d) or (H, K)   logits (H, K)
    log_tau (H,), optional: the learned log-temperature, tau = exp(log_tau)

The mixing itself is gma_np.gma_forward / gma_backward (the fast causal scan).
The only new gradient is the temperature's: gma_backward returns dL/dtau, and
tau = exp(log_tau) gives dL/dlog_tau = dL/dtau * tau (docs/training.md).

`gma_layer_chunk` runs the same layer on a chunk of tokens from a recurrent
state (gma_np.gma_recurrent): the decode path of gma_np.nn.model.
"""

import numpy as np

from gma_np import gma_backward, gma_forward, gma_recurrent
from gma_np.nn.layers import linear_backward, linear_forward

MIXTURE_NAMES = ("means", "log_var", "logits", "log_tau")


def _split_heads(x, H):
    """(B, N, H*c) -> (B, H, N, c), contiguous."""
    B, N, Hc = x.shape
    return np.ascontiguousarray(x.reshape(B, N, H, Hc // H).transpose(0, 2, 1, 3))


def _merge_heads(x):
    """(B, H, N, c) -> (B, N, H*c)."""
    B, H, N, c = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * c)


def temperature_of(p):
    """The temperature gma_forward gets: exp(log_tau) (H,) if the layer learns it, else 1.0."""
    return np.exp(p["log_tau"]) if "log_tau" in p else 1.0


def gma_layer_forward(x, p, *, n_heads, causal=True, norm="row"):
    """Y (B, N, D) of the multi-head GMA layer. Cache: the three projections' caches,
    the GMA cache and the temperature (nothing is recomputed but what gma_backward does)."""
    H = n_heads
    # 1. projections, split into heads
    q, cq = linear_forward(x, p["Wq"], p["bq"])                      # (B, N, H*d)
    k, ck = linear_forward(x, p["Wk"], p["bk"])                      # (B, N, H*d)
    v, cv = linear_forward(x, p["Wv"], p["bv"])                      # (B, N, H*e)
    q, k, v = _split_heads(q, H), _split_heads(k, H), _split_heads(v, H)
    # 2. per-head mixing through the K-slot memory
    tau = temperature_of(p)
    o, cg = gma_forward(q, k, v, p["means"], p["log_var"], p["logits"], causal=causal,
                        norm=norm, temperature=tau)                  # (B, H, N, e)
    # 3. merge heads and project out
    y, co = linear_forward(_merge_heads(o), p["Wo"], p["bo"])        # (B, N, D)
    return y, (cq, ck, cv, cg, co, tau, H)


def gma_layer_backward(dy, cache):
    """(dx (B, N, D), grads dict keyed like the parameters) of gma_layer_forward."""
    cq, ck, cv, cg, co, tau, H = cache
    g = {}
    # 3. in the forward pass this was: y = concat_h(o_h) Wo + bo
    do, g["Wo"], g["bo"] = linear_backward(dy, co)                   # do (B, N, H*e)
    # 2. in the forward pass this was: o = gma(q, k, v; mixture, tau)
    gg = gma_backward(_split_heads(do, H), cg)
    for name in ("means", "log_var", "logits"):
        g[name] = gg[name]
    if isinstance(tau, np.ndarray):
        # tau = exp(log_tau): d tau / d log_tau = tau
        g["log_tau"] = (gg["temperature"] * tau).astype(tau.dtype)
    # 1. in the forward pass this was: q, k, v = x W + b, split into heads
    dx, g["Wq"], g["bq"] = linear_backward(_merge_heads(gg["q"]), cq)
    dxk, g["Wk"], g["bk"] = linear_backward(_merge_heads(gg["k"]), ck)
    dxv, g["Wv"], g["bv"] = linear_backward(_merge_heads(gg["v"]), cv)
    dx += dxk
    dx += dxv
    return dx, g


def gma_layer_chunk(x, p, state, *, n_heads, norm="row"):
    """The causal layer on a chunk x (B, n, D) continuing from `state` (a gma_np.GMAState
    or None): returns (y (B, n, D), the state after the chunk). Forward only."""
    H = n_heads
    q = _split_heads(x @ p["Wq"] + p["bq"], H)                        # (B, H, n, d)
    k = _split_heads(x @ p["Wk"] + p["bk"], H)                        # (B, H, n, d)
    v = _split_heads(x @ p["Wv"] + p["bv"], H)                        # (B, H, n, e)
    o, state = gma_recurrent(q, k, v, p["means"], p["log_var"], p["logits"], state,
                             norm=norm, temperature=temperature_of(p))
    return _merge_heads(o) @ p["Wo"] + p["bo"], state


def project_keys(x, p, n_heads):
    """K = X W_k + b_k split into heads: (B, H, N, d). Used by the mixture initialisation."""
    return _split_heads(x @ p["Wk"] + p["bk"], n_heads)
