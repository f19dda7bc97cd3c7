"""Mixture routing by broadcasting over (N, K, d): the definition, written plainly.

Dimension legend: H heads, N tokens, K components, d feature size.

This is the reference the Numba kernels of gma_np.mixers.gma.routing are checked
against. It materialises the (..., H, N, K, d) array of differences x - mu,
so it is for small inputs only. float64 throughout.
"""

import numpy as np
from scipy.special import logsumexp

from gma_np._numerics import LOG_2PI


def _full_log_var(log_var, d):
    """log_var (H, K, d) or (H, K) -> (H, K, d)."""
    log_var = np.asarray(log_var, dtype=np.float64)
    if log_var.ndim == 2:
        return np.repeat(log_var[:, :, None], d, axis=2)
    return log_var


def log_density_naive(x, means, log_var, logits):
    """l (..., H, N, K): l_k(x) = log pi_k + log N(x; mu_k, diag exp(log_var_k))."""
    x = np.asarray(x, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)                    # (H, K, d)
    lv = _full_log_var(log_var, means.shape[-1])                   # (H, K, d)
    log_pi = logits - logsumexp(logits, axis=-1, keepdims=True)    # (H, K)
    diff = x[..., :, None, :] - means[:, None, :, :]               # (..., H, N, K, d)
    quad = (diff ** 2 * np.exp(-lv)[:, None]).sum(-1)              # (..., H, N, K)
    return log_pi[:, None, :] - 0.5 * (quad + lv.sum(-1)[:, None, :]
                                       + means.shape[-1] * LOG_2PI)


def responsibilities_naive(x, means, log_var, logits, temperature=1.0):
    """r (..., H, N, K) = softmax_k(l_k(x) / tau); tau a float or (H,)."""
    tau = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (means.shape[0],))
    a = log_density_naive(x, means, log_var, logits) / tau[:, None, None]
    return np.exp(a - logsumexp(a, axis=-1, keepdims=True))


def routed_keys_and_queries_naive(q, k, means, log_var, logits, temperature, key_mask):
    """(R_Q, R~_K) of GMA, both (B, H, N, K): R~_K = key_mask * r(k); key_mask (B, N) or None."""
    B, _, N, _ = np.shape(q)
    mask = np.ones((B, N)) if key_mask is None else np.asarray(key_mask, dtype=np.float64)
    rq = responsibilities_naive(q, means, log_var, logits, temperature)
    rk = responsibilities_naive(k, means, log_var, logits, temperature) * mask[:, None, :, None]
    return rq, rk


def log_likelihood_naive(x, means, log_var, logits):
    """log p(x) (..., H, N) = logsumexp_k l_k(x)."""
    return logsumexp(log_density_naive(x, means, log_var, logits), axis=-1)


def responsibilities_backward_naive(dr, x, means, log_var, logits, temperature=1.0):
    """Gradients of sum(r * dr) by broadcasting, derived independently of the kernels.

    Returns a dict "x", "means", "log_var", "logits", "temperature" (the last
    one of shape (H,), per head: sum it for a scalar temperature).
    """
    x = np.asarray(x, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    H, K, d = means.shape
    lv = _full_log_var(log_var, d)
    tau = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (H,))
    l = log_density_naive(x, means, log_var, logits)               # (..., H, N, K)
    a = l / tau[:, None, None]
    r = np.exp(a - logsumexp(a, axis=-1, keepdims=True))
    da = r * (dr - (r * dr).sum(-1, keepdims=True))                # softmax Jacobian
    lead = tuple(range(da.ndim - 3))
    dtau = -(da * a).sum(axis=lead + (-2, -1)) / tau               # (H,)
    dl = da / tau[:, None, None]                                   # (..., H, N, K)
    diff = x[..., :, None, :] - means[:, None, :, :]               # (..., H, N, K, d)
    w = diff * np.exp(-lv)[:, None]                                # (x - mu) / sigma2
    dx = -(dl[..., None] * w).sum(-2)                              # (..., H, N, d)
    dmeans = (dl[..., None] * w).sum(axis=lead + (-3,))            # (H, K, d)
    dlv = 0.5 * (dl[..., None] * (diff * w - 1.0)).sum(axis=lead + (-3,))
    if np.ndim(log_var) == 2:
        dlv = dlv.sum(-1)
    dlog_pi = dl.sum(axis=lead + (-2,))                            # (H, K)
    pi = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    dlogits = dlog_pi - pi * dlog_pi.sum(-1, keepdims=True)
    return {"x": dx, "means": dmeans, "log_var": dlv, "logits": dlogits, "temperature": dtau}
